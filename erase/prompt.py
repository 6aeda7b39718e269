"""The in-context prompt template lives in core (SISA-LM renders labelled records with it too)."""
from core.prompt import PromptTemplate  # noqa: F401
