"""Shared test setup: hypothesis profiles and skips that say why."""

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

# Compiles and model builds are slow: no deadline. CI is derandomized so a red run is reproducible.
settings.register_profile("default", deadline=None, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.register_profile("gpu", parent=settings.get_profile("default"), max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch + transformers (the parity oracle) are not installed")
