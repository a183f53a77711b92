"""The finetune_instruct stage alone, as a Prefect flow: `python -m flows.finetune_instruct [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("finetune_instruct")
