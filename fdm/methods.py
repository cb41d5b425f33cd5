"""The --precond options: which preconditioner, which loss, and which FDM settings each one means.

One table for train.py's config, the demo, the miniature reproduction and the benchmark, so a
method means the same everywhere. As in the reference FDM train.py: the three FDM methods take
the loss-weight warmup (`warmup_ite`), and FDM-VP / FDM-EDM take the momentum multiplier m of
s(sigma) (`fdm_multiplier`); FDM-VE ignores the multiplier, as the reference does.
"""

# --precond -> (preconditioner class, loss class). iDDPM trains like VP on its discrete sigma table.
METHODS = dict(
    vp=('VPPrecond', 'VPLoss'),
    ve=('VEPrecond', 'VELoss'),
    iddpm=('iDDPMPrecond', 'iDDPMLoss'),
    edm=('EDMPrecond', 'EDMLoss'),
    fdm_vp=('FDM_VPPrecond', 'VPLoss'),
    fdm_ve=('FDM_VEPrecond', 'VELoss'),
    fdm_edm=('FDM_EDMPrecond', 'EDMLoss'),
)

# Options that only some methods use: option -> the --precond values that use it.
METHOD_SPECIFIC_OPTIONS = dict(warmup_ite={'fdm_vp', 'fdm_ve', 'fdm_edm'}, fdm_multiplier={'fdm_vp', 'fdm_edm'})

# Display names, as the paper's tables label the methods.
TITLES = dict(vp='VP', ve='VE', iddpm='iDDPM', edm='EDM', fdm_vp='VP-FDM', fdm_ve='VE-FDM', fdm_edm='EDM-FDM')

def is_fdm(precond):
    return precond.startswith('fdm_')

def method_kwargs(precond, warmup_ite=None, fdm_multiplier=2.0):
    """(preconditioner kwargs, loss kwargs) that --precond adds: the class names, and FDM's
    warmup and multiplier where the method uses them (train.py's config checks the name)."""
    precond_class, loss_class = METHODS[precond]
    network_kwargs, loss_kwargs = dict(class_name=precond_class), dict(class_name=loss_class)
    if 'warmup_ite' in _users_of(precond):
        loss_kwargs['warmup_ite'] = warmup_ite
    if 'fdm_multiplier' in _users_of(precond):
        network_kwargs['fdm_multiplier'] = fdm_multiplier
    return network_kwargs, loss_kwargs

def _users_of(precond):
    return {option for option, users in METHOD_SPECIFIC_OPTIONS.items() if precond in users}
