# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""The BD3-LM block NELBO per token as a 🤗 `evaluate` metric, loadable offline from its folder:

import evaluate
from bd3lm_trainer.evaluation import NELBO_METRIC_PATH

metric = evaluate.load(NELBO_METRIC_PATH)
metric.compute(predictions=["Some text."], model_id="path/to/bd3lm-checkpoint")
"""

import math

import datasets
import evaluate

from bd3lm_trainer.corpus import resolve_tokenizer
from bd3lm_trainer.evaluation import load_model_and_tokenizer, score_continuations

_CITATION = """\
@inproceedings{arriola2025block,
  title={Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models},
  author={Arriola, Marianne and Gokaslan, Aaron and Chiu, Justin T. and Yang, Zhihan and Qi, Zhixuan and Han, Jiaqi
          and Sahoo, Subham Sekhar and Kuleshov, Volodymyr},
  booktitle={International Conference on Learning Representations},
  year={2025}
}
"""

_DESCRIPTION = """\
Per-token block NELBO of a BD3-LM (Arriola et al., 2025, Eq. (8)) on each text: an upper bound, in expectation over
the noise draws, on the negative log-likelihood per token (nats); exp of it bounds the perplexity. Every text is
scored on its own after a BOS/EOS token, with a sliding window when it is longer than the model's window. The value is
exact at block size 1 with a time-independent log-linear model; otherwise a Monte-Carlo estimate with `num_samples`
draws, or the exact expectation over the noise with `exact=True`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]` or `list[list[int]]`): texts, or token ids of the model's tokenizer.
    model_id (`str`): checkpoint folder or Hub id (or pass `model=` a loaded model).
    model (`BD3LMForMaskedDiffusion`, *optional*): a loaded model instead of `model_id`.
    tokenizer (`str` or tokenizer, *optional*): defaults to the checkpoint's; "bd3lm-corpus" for the embedded one.
    num_samples (`int`, defaults to 1): Monte-Carlo noise draws per text.
    batch_size (`int`, defaults to 8): windows per forward pass.
    seed (`int`, defaults to 0): seed of the noise draws (each text's draws depend only on it and the text).
    device (`str`, *optional*): where to load `model_id`.
    exact (`bool`, defaults to `False`): the expectation over the noise by enumerating each block's mask patterns
        (2^block_size - 1 forward passes, block_size <= 8) instead of `num_samples` draws.
Returns:
    nelbos (`list[float]`): per-token NELBO of each text (nats).
    perplexities (`list[float]`): exp of each.
    mean_nelbo (`float`): token-weighted mean over all texts (Σ NELBO / Σ tokens).
    perplexity (`float`): exp(mean_nelbo), the corpus-level perplexity bound.
    num_tokens (`int`): scored tokens.
Examples:
    >>> metric = evaluate.load(NELBO_METRIC_PATH)  # doctest: +SKIP
    >>> metric.compute(predictions=["In the beginning"], model_id=path, tokenizer="bd3lm-corpus")  # doctest: +SKIP
    {'nelbos': [...], 'perplexities': [...], 'mean_nelbo': ..., 'perplexity': ..., 'num_tokens': 3}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BD3LMNelbo(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            ],
            reference_urls=["https://arxiv.org/abs/2503.09573"],
        )

    def _compute(
        self,
        predictions,
        model_id=None,
        model=None,
        tokenizer=None,
        num_samples=1,
        batch_size=8,
        seed=0,
        device=None,
        exact=False,
    ):
        if model is None:
            if model_id is None:
                raise ValueError("Pass `model_id` (a BD3-LM checkpoint folder or Hub id) or `model`.")
            model, tokenizer = load_model_and_tokenizer(model_id, tokenizer, device)
        elif tokenizer is None or isinstance(tokenizer, str):
            tokenizer = resolve_tokenizer(tokenizer or model.name_or_path)
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: nothing to score.")
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        targets = [
            tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in predictions
        ]
        for i, target in enumerate(targets):
            if not target:
                raise ValueError(f"Prediction {i} has no tokens to score.")
        scores = score_continuations(
            model,
            [([prefix], t) for t in targets],
            num_samples=num_samples,
            batch_size=batch_size,
            seed=seed,
            pad_token_id=tokenizer.pad_token_id or 0,
            exact=exact,
        )
        nelbos = [value / len(t) for (value, _), t in zip(scores, targets)]
        total = sum(len(t) for t in targets)
        mean = sum(value for value, _ in scores) / total
        return {
            "nelbos": nelbos,
            "perplexities": [math.exp(v) for v in nelbos],
            "mean_nelbo": mean,
            "perplexity": math.exp(mean),
            "num_tokens": total,
        }
