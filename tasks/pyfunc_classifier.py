"""The registered text classifier, as an MLflow pyfunc logged "from code".

Artifacts: `model_dir` (the classifier folder: weights, config.json with its labels, and its tokenizer's
files). Input: a list of texts (or a one-column DataFrame).
Output: a DataFrame with `label` and `probability` (of that label), one row per text.

    model = mlflow.pyfunc.load_model("models:/lmcore-classifier/1")
    model.predict(["You won a free prize! Text WIN to 80082"])
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel

# The explicit signature the model is logged with does the validation; MLflow's nag for type hints is noise.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


class TextClassifier(PythonModel):
    def load_context(self, context):
        from lmcore.finetune.classifier import load_classifier
        from lmcore.tokenizer import load_tokenizer

        self.model, self.labels, self.max_length = load_classifier(context.artifacts["model_dir"])
        self.enc = load_tokenizer(context.artifacts["model_dir"])  # the model folder carries its tokenizer

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from lmcore.finetune.classifier import classify

        if hasattr(model_input, "columns"):
            texts = [str(t) for t in model_input.iloc[:, 0]]
        else:
            texts = [str(t) for t in model_input]
        probs = classify(self.model, self.enc, texts, self.max_length)
        best = probs.argmax(1)
        return pd.DataFrame({"label": [self.labels[i] for i in best], "probability": probs.max(1).astype(float)})


mlflow.models.set_model(TextClassifier())
