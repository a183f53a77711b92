"""The registered text-generation model, as an MLflow pyfunc logged "from code".

MLflow loads this file with the model's artifacts: `model_dir` (model.safetensors + config.json)
and, when one was configured, `tokenizer` (the tiktoken ranks file), so loading needs no network.
Input: a list of prompts (or a one-column DataFrame of them). Output: one completion per prompt.

    model = mlflow.pyfunc.load_model("models:/lmcore-base/1")
    model.predict(["ROMEO:"], params={"max_new_tokens": 20, "temperature": 0.0})
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TextGenerator(PythonModel):
    def load_context(self, context):
        from lmcore.checkpoint import load_model
        from lmcore.tokenizer import get_encoding

        self.model = load_model(context.artifacts["model_dir"]).eval()
        self.enc = get_encoding("gpt2", ranks_file=context.artifacts.get("tokenizer"))

    def predict(self, context, model_input, params=None):
        from lmcore.generation import generate_text

        params = params or {}
        if hasattr(model_input, "columns"):  # MLflow hands a DataFrame after schema enforcement
            prompts = [str(p) for p in model_input.iloc[:, 0]]
        else:
            prompts = [str(p) for p in model_input]
        return [
            generate_text(
                self.model,
                self.enc,
                prompt,
                max_new_tokens=int(params.get("max_new_tokens", 50)),
                temperature=float(params.get("temperature", 0.8)),
                top_k=int(params["top_k"]) if params.get("top_k") else None,
                seed=int(params.get("seed", 0)),
            )
            for prompt in prompts
        ]


mlflow.models.set_model(TextGenerator())
