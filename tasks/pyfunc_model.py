"""The registered text-generation model, as an MLflow pyfunc logged "from code".

MLflow loads this file with the model's artifact `model_dir` (model.safetensors, config.json and the tokenizer
files it carries), so loading needs no network and no environment variable.
Input: a list of prompts (or a one-column DataFrame of them). Output: one completion per prompt.
An instruction model (its config.json names a template) takes instructions instead: each is put in
the template it was trained with (for "chat", a user message in the chat template its tokenizer carries, the
reply ending at the template's end of turn) and the output is the response alone.

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
        from lmcore.tokenizer import load_tokenizer

        model_dir = context.artifacts["model_dir"]
        self.model = load_model(model_dir).eval()
        self.template = read_model_config(model_dir)[1].get("template")
        self.enc = load_tokenizer(model_dir)  # the model folder carries its tokenizer: no network, no environment

    def predict(self, context, model_input, params=None):
        from lmcore.finetune.data import instruction_prompt
        from lmcore.generation import stream_text

        params = params or {}
        outputs = []
        for text in as_texts(model_input):
            prompt, stop_ids = instruction_prompt({"instruction": text, "input": ""}, self.enc, self.template) if self.template else (text, [])
            completion = "".join(stream_text(
                self.model,
                self.enc,
                prompt,
                max_new_tokens=int(params.get("max_new_tokens", 50)),
                temperature=float(params.get("temperature", 0.8)),
                top_k=int(params["top_k"]) if params.get("top_k") else None,
                seed=int(params.get("seed", 0)),
                stop_ids=stop_ids,
            ))
            outputs.append(completion.strip() if self.template else completion)
        return outputs


mlflow.models.set_model(TextGenerator())
