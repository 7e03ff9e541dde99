# ACL policy of the gateway itself, applied by `gateway vault bootstrap` as policy
# "gateway". The gateway may mint tokens through the per-tenant token roles
# (gateway-tenant-<id>), each restricted to its tenant's policy, and nothing more: it
# cannot read any tenant's secret with its own token. Looking up and renewing its own
# token come from Vault's default policy.

path "auth/token/create/gateway-tenant-*" {
  capabilities = ["create", "update"]
}
