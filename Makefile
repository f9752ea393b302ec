# Convenience targets; each is the same as the README's commands.
.PHONY: install quickstart test
install:
	bash scripts/bootstrap.sh install
quickstart:
	bash scripts/bootstrap.sh quickstart
test:
	bash scripts/bootstrap.sh test
