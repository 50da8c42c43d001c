"""Human labels for a scan's pairs: which pairs to show (``queue``), where labels live
(``store``, SQLite), how raters agree (``agreement``, Fleiss' kappa) and the local web page
(``server``). ``deepssim label`` is the command line of this package."""

from deepssim.labelling.agreement import AgreementReport, agreement, fleiss_kappa, summarise
from deepssim.labelling.queue import ScanPairs, choose_pairs
from deepssim.labelling.store import LABELS, LabelStore

__all__ = [
    "LABELS",
    "AgreementReport",
    "LabelStore",
    "ScanPairs",
    "agreement",
    "choose_pairs",
    "fleiss_kappa",
    "summarise",
]
