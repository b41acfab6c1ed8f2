import os

from hypothesis import HealthCheck, settings

# ci: the same examples every run and no time limit, so CI is repeatable on slow machines.
# fuzz: fresh random examples, many more of them; opt in with --hypothesis-profile=fuzz.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=12,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # torch 2.14 scripts its forward-mode decompositions on the first jvp and warns for each
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script` is deprecated:FutureWarning")
