"""Helpers shared by the tests (on the path through setup.cfg's pytest pythonpath)."""
import os

# ../shared beside the repository (the corpus of public captures and llhttp vectors)
SHARED = os.environ.get("REDTAP_SHARED", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared"))
