"""The benchmark stage alone, as a Prefect flow: `python -m flows.benchmark [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("benchmark")
