"""A kernel worker that is one rank of a DeepSpeed ZeRO-3 group: the model is partitioned across ranks.

Every rank holds a flat 1/W slice of every parameter (ZeRO-3), so a model larger than one device fits in
the group. All ranks run the SAME example through the model (ZeRO-3 gathers each layer's parameters for
its forward and backward and releases them afterwards); the gradient autograd produces for a parameter
is therefore the full per-example gradient on every rank, and each rank keeps only the part that falls in
its own partition. Concatenated over the selected parameters this is the rank's slice of the per-example
Jacobian, so the per-rank partial kernels ``J_r J_rᵀ`` sum to the full kernel — which is what the kernel
job's reducer does with the partial tiles of parameter shards.

No gradient is reduce-scattered (DeepSpeed's training path averages gradients across ranks; that is
never involved here): each rank reads its own autograd result, un-averaged, exactly as a single process
would compute it.

Collectives: ``__init__``, :meth:`Zero3KernelWorker.jacobian`, :meth:`Zero3KernelWorker.logits` and
:meth:`Zero3KernelWorker.gathered_param` gather parameters, so every rank of the group must make the same
calls with the same arguments in the same order. :meth:`Zero3KernelWorker.tile` is local.

No Ray here: ``freeshap_ray.distributed.zero3_group`` turns it into a group of actors.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import KernelConfig, ModelConfig
from .ntk import kernel_tile

__all__ = ["Rank", "Zero3KernelWorker", "zero3_config"]


def zero3_config() -> dict:
    """DeepSpeed config of the group: ZeRO stage 3, float32, no optimizer.

    The persistence thresholds are 0 so that every parameter is partitioned (by default DeepSpeed keeps
    parameters under 100k elements whole on every rank).
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "overlap_comm": False,
        },
    }


@dataclass(frozen=True)
class Rank:
    """This rank's place in the group: ``RANK`` / ``WORLD_SIZE``, the rendezvous (rank 0's node and a free port
    there) and ``LOCAL_RANK``, the device index (0 when the scheduler shows each rank only its own GPU, as Ray
    does)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0


class Zero3KernelWorker:
    """One rank of a ZeRO-3 group; same interface as :class:`~freeshap_ray.kernel.worker.KernelWorker`.

    Args:
        model_dir: resolved local model directory.
        model_cfg: template, label words, parameter selection (the kernel is over these parameters).
        cfg: the kernel settings (``kind``; torch threads = ``num_cpus_per_actor``; nccl on CUDA when
            ``num_gpus_per_actor > 0``, else gloo on CPU).
        rank: this rank's place in the group.
        timeout_s: timeout of the group's collectives (and of the rendezvous).
    """

    def __init__(self, model_dir: str | Path, model_cfg: ModelConfig, cfg: KernelConfig, rank: Rank,
                 timeout_s: float = 1800.0):
        torch.set_num_threads(cfg.threads)
        device, kind, local_rank = cfg.device, cfg.kind, rank.local_rank
        rank, world_size, master_addr, master_port = rank.rank, rank.world_size, rank.master_addr, rank.master_port
        if not str(device).startswith("cuda"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU probing (and no warning about it)
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from ..models import add_lora, load_lm, select_params
        from ..models.prompt import PromptClassifier

        self.kind = kind
        self.rank, self.world_size = int(rank), int(world_size)
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
            # gloo runs every collective here. DeepSpeed's CPU shared-memory all-reduce op is not needed and
            # would be compiled just in time (gcc + ninja) on first use: mark it unavailable. (DeepSpeed
            # probes op compatibility lazily and keeps the dict, so the entry persists.)
            import deepspeed.ops as ds_ops

            ds_ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s), rank=self.rank,
                                   world_size=self.world_size)
        config = zero3_config()
        # Must be alive during from_pretrained: transformers then builds the model inside
        # deepspeed.zero.Init (partitioned as it is created, so no rank ever holds the whole model) and
        # loads the checkpoint into the partitions. (tests/test_zero3.py compares gathered weights with the
        # safetensors file.)
        self._hf_ds_config = HfDeepSpeedConfig(config)
        lm = load_lm(model_dir, trust_remote_code=model_cfg.trust_remote_code, attn_implementation="eager")
        if model_cfg.lora_r > 0:
            add_lora(lm.model, r=model_cfg.lora_r, alpha=model_cfg.lora_alpha, targets=model_cfg.lora_targets,
                     seed=model_cfg.seed)
        # The label-word head copies rows of the (partitioned) output/input embedding: gather them first.
        emb = [lm.model.get_input_embeddings()]
        if lm.kind != "encoder":
            emb.append(lm.model.get_output_embeddings())
        rows = [p for m in emb if m is not None for p in m.parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters(rows):
            clf = PromptClassifier(lm, model_cfg.template, model_cfg.label_words, model_cfg.max_length)
        self.names = select_params(clf, model_cfg.params)
        chosen = set(self.names)
        for name, p in clf.named_parameters():
            p.requires_grad_(name in chosen)
        # No optimizer: deepspeed.initialize wraps the model in ZeRO-3 parameter partitioning only
        # (DeepSpeedZeRoOffload), converting the head/LoRA parameters created after from_pretrained.
        self.engine, *_ = deepspeed.initialize(model=clf, config=config)
        self.clf = clf
        self.n_classes = clf.n_classes
        params = dict(clf.named_parameters())
        # This rank's slice [start, stop) of each selected parameter (flattened), and its offset in a
        # Jacobian row. DeepSpeed pads the last partition; padding is not part of the layout.
        self._slices: dict[str, tuple[int, int, int]] = {}
        offset = 0
        for name in self.names:
            p = params[name]
            part = int(p.ds_tensor.numel())
            start = min(self.rank * part, int(p.ds_numel))
            stop = min(start + part, int(p.ds_numel))
            self._slices[name] = (start, stop, offset)
            offset += stop - start
        self.n_local = offset
        self._row: torch.Tensor | None = None
        self._hooks = [params[n].register_post_accumulate_grad_hook(self._grab(n)) for n in self.names]

    # ------------------------------------------------------------------------------------------
    def _grab(self, name: str):
        start, stop, offset = self._slices[name]

        def hook(p: torch.Tensor) -> None:
            if self._row is not None and stop > start:
                self._row[offset: offset + stop - start] = p.grad.reshape(-1)[start:stop]
            p.grad = None  # nothing accumulates: the next backward starts from zero

        return hook

    def layout(self) -> dict[str, tuple[int, int, int]]:
        """``name -> (start, stop, offset)``: this rank's slice of each flattened selected parameter and
        where it sits in a local Jacobian row (tests reassemble full Jacobians from it)."""
        return dict(self._slices)

    def _encode_one(self, text: str):
        b = self.clf.encode([text])  # one unpadded example
        return b.input_ids.to(self.device), b.attention_mask.to(self.device), b.read_pos.to(self.device)

    def jacobian(self, texts: list[str]) -> np.ndarray:
        """(B, C', P_local) float32: this rank's slice of each example's Jacobian (collective)."""
        c = 1 if self.kind == "first_logit" else self.n_classes
        out = torch.zeros((len(texts), c, self.n_local), dtype=torch.float32, device=self.device)
        try:
            for b, text in enumerate(texts):
                inputs = self._encode_one(text)
                for k in range(c):
                    # One forward per backward: ZeRO-3 releases the gathered parameters after a backward,
                    # so a retained graph cannot be back-propagated a second time.
                    logit = self.clf(*inputs)[0, k]
                    self._row = out[b, k]
                    logit.backward()
        finally:
            self._row = None
        return out.cpu().numpy()

    def tile(self, ja: np.ndarray, jb: np.ndarray, chunk: int) -> np.ndarray:
        """float64 partial kernel tile between two local Jacobian blocks (see :func:`kernel_tile`); local."""
        return kernel_tile(ja, jb, chunk=chunk)

    def logits(self, texts: list[str]) -> np.ndarray:
        """(B, C) float64 label-word logits of the ZeRO-3 model, one example at a time (collective)."""
        rows = []
        with torch.no_grad():
            for text in texts:
                rows.append(self.clf(*self._encode_one(text))[0].double().cpu().numpy())
        return np.stack(rows)

    def gathered_param(self, name: str) -> np.ndarray:
        """The full value of one parameter, gathered from all ranks (collective)."""
        import deepspeed

        p = dict(self.clf.named_parameters())[name]
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().cpu().numpy().copy()

    def local_numel(self) -> int:
        """Scalars of the selection held by this rank (P_local)."""
        return self.n_local

    def close(self) -> None:
        """Leave the process group (the actor's process ends with it anyway)."""
        for h in self._hooks:
            h.remove()
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
