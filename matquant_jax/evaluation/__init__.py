"""Evaluation: log-perplexity, zero-shot multiple-choice tasks and the paper's figures.

    from matquant_jax import evaluation
    evaluation.log_perplexity(config, params, tokenizer, "tfds:c4/en", plan="ffn:int4")
    results = evaluation.evaluate_tasks(config, params, tokenizer, evaluation.PAPER_TASKS,
                                        plan="ffn:int4", tfds_data_dir=...)
    evaluation.task_average(results)
"""

from matquant_jax.evaluation.perplexity import log_perplexity
from matquant_jax.evaluation.perplexity import token_nll
from matquant_jax.evaluation.plots import pareto_front
from matquant_jax.evaluation.plots import plot_code_histograms
from matquant_jax.evaluation.plots import plot_quality_vs_bits
from matquant_jax.evaluation.tasks import PAPER_TASKS
from matquant_jax.evaluation.tasks import TASKS
from matquant_jax.evaluation.tasks import MultipleChoice
from matquant_jax.evaluation.tasks import TaskSpec
from matquant_jax.evaluation.tasks import kjv_next_verse_examples
from matquant_jax.evaluation.tasks import load_task
from matquant_jax.evaluation.zero_shot import encode_pair
from matquant_jax.evaluation.zero_shot import evaluate_examples
from matquant_jax.evaluation.zero_shot import evaluate_tasks
from matquant_jax.evaluation.zero_shot import loglikelihoods
from matquant_jax.evaluation.zero_shot import score_requests
from matquant_jax.evaluation.zero_shot import task_average

__all__ = [
    "MultipleChoice", "PAPER_TASKS", "TASKS", "TaskSpec", "encode_pair", "evaluate_examples",
    "evaluate_tasks", "kjv_next_verse_examples", "load_task", "log_perplexity",
    "loglikelihoods", "pareto_front", "plot_code_histograms", "plot_quality_vs_bits",
    "score_requests", "task_average", "token_nll",
]
