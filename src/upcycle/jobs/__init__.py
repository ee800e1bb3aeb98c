"""One function per command (soup, tune, grow, the full fine-tune): config in, result out.
The CLI, the demo and the benchmarks all call these."""
