"""The loss terms, one module each. Importing a module registers its term in ``TERMS``; the order of
this import line is the order terms are summed and logged in."""

from distill.losses.terms.base import COUNTS, TERMS, Output, Term, register  # noqa: F401
from distill.losses.terms import ce, kd, hidden, attention, relation, mse  # noqa: F401  (each registers its term)
