"""The unified objective: registries of small named functions, and the Objective that
combines them (METHODS.md §1-4). Choose each part by name in ``ObjectiveConfig``."""
from kdrl.objective.advantages import ADVANTAGES
from kdrl.objective.controllers import BETA_CONTROLLERS
from kdrl.objective.divergences import SAMPLED_KL, VOCAB_DIVERGENCES, vocab_terms, vocab_terms_chunked
from kdrl.objective.loss import Objective
from kdrl.objective.policy_gradient import OFFPOLICY_PG, PG_ANCHORS
from kdrl.objective.schedules import BETA_SCHEDULES, PHASES, beta_at
from kdrl.objective.weights import KD_MASKS, LOSS_AGGREGATIONS, ROW_WEIGHTS, TOKEN_SELECTIONS

__all__ = [
    "ADVANTAGES", "BETA_CONTROLLERS", "BETA_SCHEDULES", "KD_MASKS", "LOSS_AGGREGATIONS", "OFFPOLICY_PG", "PG_ANCHORS",
    "PHASES", "ROW_WEIGHTS", "SAMPLED_KL", "TOKEN_SELECTIONS", "VOCAB_DIVERGENCES",
    "Objective", "beta_at", "vocab_terms", "vocab_terms_chunked",
]
