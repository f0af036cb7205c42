"""Server strategies of fedcl, one module per method, each registered by name through
:func:`fedcl.plugins.register_strategy`.

:mod:`fedcl.plugins` names the built-ins by string reference and imports a strategy's module only
when a run asks for it, so importing this package imports none of them.
"""
