"""Test-wide settings: hypothesis never fails a test on timing (tests never assert speed)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "appscale-tq",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile("appscale-tq")
