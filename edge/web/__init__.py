"""The local page at the microscope: live annotated view, the sample's tally, and review of flagged cells.

Off by default (``[web] enabled``), loopback only unless configured with a token. The agent makes one
``WebPage`` and calls ``observe`` once per analysed frame; everything else (encoding frames, storing
review crops, answering browsers) happens on the page's own threads, so the pipeline's rate does not
depend on whether anyone is watching. See server.py (HTTP), security.py (access), reviews.py (labels).
"""

from edge.web.server import WebPage

__all__ = ["WebPage"]
