"""Stage two, `cli.py distill`: train a 3D student from the cache alone (DistInit, MoDist, LSS and their
combinations), plus `cli.py concepts`, the language concept bank that lss trains against."""
