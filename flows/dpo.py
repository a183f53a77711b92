"""The dpo stage alone, as a Prefect flow: `python -m flows.dpo [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("dpo")
