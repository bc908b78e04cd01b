"""`fedsea audit`: play the server, try to read the user's text back from the noised
hidden states it receives, and measure what the noise costs in perplexity.

`run_audit(AuditConfig(...)) -> AuditReport` is the importable entry point; see
docs/privacy.md for the threat model, the attacks and the measured results.
"""

from .config import AuditConfig
from .run import AuditReport, run_audit

__all__ = ["AuditConfig", "AuditReport", "run_audit"]
