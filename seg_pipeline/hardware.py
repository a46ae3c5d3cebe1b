"""What this machine can do fast, detected rather than assumed (machines differ between sessions)."""

from __future__ import annotations

#: The CPU flag that makes bf16 autocast pay off (Intel AMX tiles with bf16 support).
AMX_FLAG = "amx_bf16"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has AMX bf16 tiles (bf16 autocast then beats fp32; without them it does not)."""
    return AMX_FLAG in cpu_flags()
