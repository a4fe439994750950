"""Access control for one mesh: authentication, policy and limits behind two calls.

The listeners (the data plane) call, per routed call::

    access = Access(config.auth, config.policy, plugin_access, config.state_dir,
                    source=str(config_path))
    principal = access.admit(identity, authorization, "tool", "tools-demo/add", "CallTool")
    try:
        ...                              # forward the call; principal.name goes on the span
    finally:                             # and the call events
        access.release(principal)

``admit`` raises :class:`~orchestrator._authn.AuthenticationError`
(``UNAUTHENTICATED``), :class:`~orchestrator._authz.AccessDenied`
(``PERMISSION_DENIED``) or :class:`~orchestrator._limits.RateLimited`
(``RESOURCE_EXHAUSTED``); each is a ``clients.SidemeshError`` that ends the call
with its status and rich details (``await err.abort(context)``) and carries
what the ``permission_denied`` event and the log need. Listings use
``access.authenticate`` and ``access.policy.visible``. The parts are usable on
their own: :class:`Authenticator`, :class:`Policy`, :class:`PrincipalLimits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from orchestrator._auth_config import AuthConfig, PolicyConfig
from orchestrator._authn import Authenticator, Metadata
from orchestrator._authz import PluginAccess, Policy
from orchestrator._limits import PrincipalLimits
from orchestrator._principals import Principal, TransportIdentity


class Access:
    """Who may call what, and how fast: one per mesh, safe from any thread."""

    def __init__(
        self,
        auth: AuthConfig,
        policy: PolicyConfig,
        plugins: Mapping[str, PluginAccess],
        state_dir: Path,
        *,
        source: str = "sidemesh.yaml",
    ) -> None:
        self.authenticator = Authenticator(auth, state_dir)
        self.policy = Policy(auth, policy, plugins, source=source)
        self.limits = PrincipalLimits(self.policy.limits_for, source=source)

    def authenticate(self, identity: TransportIdentity, metadata: Metadata = ()) -> Principal:
        """The caller of a call (``UNAUTHENTICATED`` when it cannot be told)."""
        return self.authenticator.authenticate(identity, metadata)

    def admit(
        self,
        identity: TransportIdentity,
        authorization: str | None,
        kind: str,
        target: str,
        method: str = "",
    ) -> Principal:
        """Authenticates, authorizes ``kind`` ``target`` and takes a slot of the caller's limits.

        Call :meth:`release` with the principal when the call ends, whatever its outcome.
        """
        principal = self.authenticator.authenticate_header(identity, authorization)
        self.policy.check(principal, kind, target, method)
        self.limits.enter(principal)
        return principal

    def release(self, principal: Principal) -> None:
        """Gives back the slot :meth:`admit` took."""
        self.limits.leave(principal)
