"""The evaluate stage alone, as a Prefect flow: `python -m flows.evaluate [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("evaluate")
