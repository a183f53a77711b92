"""The finetune_classifier stage alone, as a Prefect flow: `python -m flows.finetune_classifier [params.yaml]`."""

from flows.stage import main

if __name__ == "__main__":
    main("finetune_classifier")
