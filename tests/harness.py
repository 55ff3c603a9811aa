"""The test suite's view of the throwaway servers: everything lives in
reconciler.localstack (the demo uses it too); tests import it from here."""

from reconciler.localstack import *  # noqa: F403
from reconciler.localstack import __all__ as __all__
