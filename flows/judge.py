"""The judge stage alone, as a Prefect flow: `python -m flows.judge [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("judge")
