"""Errors raised by the optimizers."""


class OptimizerError(ValueError):
    """Bad input to an optimizer (empty data, a metric that fails, a pipeline it cannot edit)."""


class BudgetExhausted(RuntimeError):
    """The LM-call budget cannot pay for the next evaluation; the search stops with what it has."""
