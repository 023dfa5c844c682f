"""INNReg (../shared/papers/innreg.txt): invertible translation + registration."""
