"""The search engine: a latency-constrained search over a space, with Optuna (default), Ray Tune or NNI.

``searchspace.search(...)`` is the entry point; ``search.py`` is a thin command-line shell over it.
"""

from .config import SearchConfig
from .engine import NoArchitectureFits, SearchResult, run, search
from .results import load_model

__all__ = ["NoArchitectureFits", "SearchConfig", "SearchResult", "load_model", "run", "search"]
