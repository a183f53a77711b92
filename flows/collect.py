"""The collect stage alone, as a Prefect flow: `python -m flows.collect [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("collect")
