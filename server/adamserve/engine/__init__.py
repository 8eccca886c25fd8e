"""Pure maths: algorithms, schedules, kernels. No I/O, no sessions."""
