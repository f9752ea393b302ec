"""The ``freeshap-ray reagent`` job: Ray fan-out gives the same attributions as the in-process API."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from freeshap_ray.cli import main
from freeshap_ray.io.reagent_store import ATTRIBUTIONS_SCHEMA, METRICS_SCHEMA

PROMPTS = [
    {"prompt": "the movie was great", "target": None},
    {"prompt": "i hated the ending and the script was a mess", "target": "awful . bad"},
    {"prompt": "a wonderful story", "target": None},
]


def _write(tmp_path, **reagent):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({k: v for k, v in p.items() if v is not None}) + "\n" for p in PROMPTS))
    cfg = {
        "prompts": {"path": str(prompts), "max_new_tokens": 2, "target_column": "target"},
        "model": {"path": "tiny:llama", "threads": 1},
        "reagent": {"num_probes": 3, "max_steps": 10, **reagent},
        "evaluation": {"baselines": ["random", "input_x_gradient"], "metrics": True, "metric_samples": 4},
        "fanout": {"num_actors": 2, "targets_per_task": 2, "num_cpus_per_actor": 0.5},
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "reagent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_reagent_cli_job_matches_api(ray_local, tmp_path, capsys):
    from freeshap_ray import reagent_attribute
    from freeshap_ray.models import load_lm, resolve_model_path

    cfg = _write(tmp_path)
    assert main(["reagent", str(cfg), "--no-progress"]) == 0
    assert "target tokens of 3 prompts" in capsys.readouterr().out
    out = tmp_path / "out"
    table = pq.read_table(out / "attributions.parquet")
    assert table.schema.names == ATTRIBUTIONS_SCHEMA.names
    assert pq.read_table(out / "metrics.parquet").schema.names == METRICS_SCHEMA.names
    assert (out / "attributions.html").read_text().startswith("<!DOCTYPE html>")
    manifest = json.loads((out / "reagent_manifest.json").read_text())
    assert manifest["summary"]["targets"] == 2 + 3 + 2 and manifest["summary"]["num_actors"] == 2
    df = table.to_pandas()
    assert set(df.method) == {"reagent", "random", "input_x_gradient"}
    assert df.score.notna().all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    lm = load_lm(resolve_model_path("tiny:llama"))
    api = reagent_attribute(lm.model, lm.tokenizer, [p["prompt"] for p in PROMPTS],
                            target=[p["target"] for p in PROMPTS], max_new_tokens=2, num_probes=3, max_steps=10)
    mine = df[df.method == "reagent"].sort_values(["prompt_id", "target_pos", "source_pos"])
    ref = api.attributions.sort_values(["prompt_id", "target_pos", "source_pos"])
    assert list(mine.target_pos) == list(ref.target_pos)  # same greedy targets
    assert np.allclose(mine.score.to_numpy(), ref.score.to_numpy(), atol=1e-6)

    assert main(["reagent", str(cfg), "--no-progress"]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_reagent_cli_bad_input_names_the_field(tmp_path, capsys):
    cfg = _write(tmp_path)
    assert main(["reagent", str(cfg), "--set", "reagent.keep_top_n=0"]) == 2
    assert "reagent.keep_top_n" in capsys.readouterr().err
    assert main(["reagent", str(cfg), "--set", "prompts.text_column=text"]) == 2
    assert "prompts.text_column" in capsys.readouterr().err
    assert main(["reagent", str(cfg), "--set", "reagent.sampler=mlm"]) == 2
    assert "reagent.mlm_path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [1, 3, 10])
def test_plan_chunks_cover_every_target_once(n):
    from freeshap_ray.distributed.reagent_job import plan_chunks
    from freeshap_ray.reagent import PreparedPrompt

    prompts = [PreparedPrompt(i, "x", np.arange(4 + k), 4, True) for i, k in enumerate([1, 5, 2, 0, 7])]
    chunks = plan_chunks(prompts, n)
    got = sorted((pp.prompt_id, int(t)) for ps, pos in chunks for pp, p in zip(ps, pos) for t in p)
    want = sorted((pp.prompt_id, int(t)) for pp in prompts for t in pp.target_positions)
    assert got == want
    assert all(sum(len(p) for p in pos) <= n for _, pos in chunks)
