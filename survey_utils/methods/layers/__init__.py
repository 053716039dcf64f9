"""The nn.Module layers the methods build, one module per family; only ``apply`` functions import them.

Keeping torch out of the family files lets the registry and every closed form load in well under a second.
"""
