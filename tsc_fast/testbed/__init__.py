"""The testbed: everything that evaluates a defense, built on the library and never imported by it.

attacks/ (one module per attack family), victims (backdoored digits models), classifier (their trainer), defenses
(FT, MCR, FST beside TSC), suite and ablate (the benchmark grids), adaptive_attack (an attacker who knows TSC),
scaling/ (cost against width), reports (tables and plots), ssl_victim (a backdoored SimCLR encoder), memory and
machine (measurement helpers). ``tsc-fast bench`` runs it.
"""
