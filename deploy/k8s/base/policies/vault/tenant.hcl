# ACL policy of one tenant, rendered by `gateway vault bootstrap` for every tenant in
# the catalog as policy "gateway-tenant-${tenant}". ${mount} is the KV v2 mount
# (GATEWAY_VAULT__MOUNT) and ${tenant} the tenant id ([a-z0-9-], checked by the catalog).
# Tokens minted for the tenant's jobs carry this policy only (plus Vault's default
# policy, which lets a token look up and renew itself): they can read the tenant's own
# secrets and list their names, and nothing else.

path "${mount}/data/tenants/${tenant}/*" {
  capabilities = ["read"]
}

path "${mount}/metadata/tenants/${tenant}/*" {
  capabilities = ["read", "list"]
}

path "${mount}/metadata/tenants/${tenant}/" {
  capabilities = ["list"]
}
