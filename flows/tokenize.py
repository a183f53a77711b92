"""The tokenize stage alone, as a Prefect flow: `python -m flows.tokenize [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("tokenize")
