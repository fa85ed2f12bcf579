"""Shared network building blocks: the fused attention branches (`attention`) and loss terms (`losses`) the families compose."""
