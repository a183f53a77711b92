"""The registered text-generation model, as an MLflow pyfunc logged "from code".

MLflow loads this file with the model's artifacts: `model_dir` (model.safetensors + config.json)
and, when one was configured, `tokenizer` (the tiktoken ranks file), so loading needs no network.
Input: a list of prompts (or a one-column DataFrame of them). Output: one completion per prompt.
An instruction model (its config.json names a template) takes instructions instead: each is put in
the template it was trained with and the output is the response alone.

    model = mlflow.pyfunc.load_model("models:/lmcore-base/1")
    model.predict(["ROMEO:"], params={"max_new_tokens": 20, "temperature": 0.0})
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel

# The explicit signature the model is logged with does the validation; MLflow's nag for type hints is noise.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


def as_texts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # MLflow hands a DataFrame after schema enforcement
        return [str(p) for p in model_input.iloc[:, 0]]
    return [str(p) for p in model_input]


class TextGenerator(PythonModel):
    def load_context(self, context):
        from lmcore.checkpoint import load_model, read_model_config
        from lmcore.tokenizer import get_encoding

        model_dir = context.artifacts["model_dir"]
        self.model = load_model(model_dir).eval()
        self.template = read_model_config(model_dir)[1].get("template")
        self.enc = get_encoding("gpt2", ranks_file=context.artifacts.get("tokenizer"))

    def predict(self, context, model_input, params=None):
        from lmcore.finetune.data import format_prompt
        from lmcore.generation import generate_text

        params = params or {}
        outputs = []
        for text in as_texts(model_input):
            prompt = format_prompt({"instruction": text, "input": ""}, self.template) if self.template else text
            completion = generate_text(
                self.model,
                self.enc,
                prompt,
                max_new_tokens=int(params.get("max_new_tokens", 50)),
                temperature=float(params.get("temperature", 0.8)),
                top_k=int(params["top_k"]) if params.get("top_k") else None,
                seed=int(params.get("seed", 0)),
            )
            outputs.append(completion.strip() if self.template else completion)
        return outputs


mlflow.models.set_model(TextGenerator())
