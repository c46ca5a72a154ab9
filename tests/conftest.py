"""Test configuration: hypothesis profiles ("ci" by default, "deep" for long runs), and every graph a
transform makes is typechecked (``REFTRACE_CHECK=1``, unless the environment sets it otherwise)."""
import os

os.environ.setdefault("REFTRACE_CHECK", "1")

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
