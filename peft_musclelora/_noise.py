"""Filters for known third-party messages that every command would otherwise print (installed on import).

PEFT imports bitsandbytes whenever it is installed, so importing bitsandbytes lazily here cannot avoid its import-time
output; bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." on every import on
AVX512-BF16 CPUs without the optional `kernels` package, before any logging is configured (so Python's last-resort
handler prints it). Its fallback kernel is the one this project was tested with, so that one message is dropped;
every other bitsandbytes message still gets through.
"""

from __future__ import annotations

import logging

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class KnownMessageFilter(logging.Filter):
    """Drops log records whose message template starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_logger = logging.getLogger(_BNB_CPU_LOGGER)
if not any(isinstance(f, KnownMessageFilter) and f.prefix == _BNB_KERNELS_MESSAGE for f in _logger.filters):
    _logger.addFilter(KnownMessageFilter(_BNB_KERNELS_MESSAGE))
