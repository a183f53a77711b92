"""The preprocess stage alone, as a Prefect flow: `python -m flows.preprocess [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("preprocess")
