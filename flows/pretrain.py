"""The pretrain stage alone, as a Prefect flow: `python -m flows.pretrain [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("pretrain")
