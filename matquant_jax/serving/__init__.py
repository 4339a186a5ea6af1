"""Serving: packed r-bit weights from one int8 MatQuant checkpoint, fast matmuls, sampling."""
