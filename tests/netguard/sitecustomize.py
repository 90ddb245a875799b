"""Installs the test socket guard in every Python process started with this folder on PYTHONPATH."""
import os

if os.environ.get("TAPIR_NETGUARD_LOG"):
    import tapir_netguard

    tapir_netguard.install()
