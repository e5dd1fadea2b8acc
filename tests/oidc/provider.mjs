// A real OpenID Connect provider (npm oidc-provider, pinned in package.json) for Yiqiao's login
// tests. Started by tests/api/oidc.rs, one per test:
//
//   node tests/oidc/provider.mjs <client_id> <client_secret> <redirect_uri>
//
// Listens on 127.0.0.1 on a free port and prints one line "ISSUER <url>" when ready.
// Accounts (log in with the login name; devInteractions' sign-in form accepts any password):
//   alice  roles ["yiqiao-admins"]     bob  roles ["yiqiao-auditors"]
//   carol  roles ["unmapped-group"]    dave roles ["yiqiao-admins", "yiqiao-auditors"]
// Consent is granted automatically for the one client (a first-party client), so a login is
// GET /auth → sign-in form → POST /interaction/<uid> (prompt=login, login=<name>) → redirects.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import Provider from 'oidc-provider';

const [clientId, clientSecret, redirectUri] = process.argv.slice(2);
if (!clientId || !clientSecret || !redirectUri) {
  console.error('usage: provider.mjs <client_id> <client_secret> <redirect_uri>');
  process.exit(2);
}

const accounts = {
  alice: { name: 'Alice Admin', roles: ['yiqiao-admins'] },
  bob: { name: 'Bob Auditor', roles: ['yiqiao-auditors'] },
  carol: { name: 'Carol Clerk', roles: ['unmapped-group'] },
  dave: { name: 'Dave Both', roles: ['yiqiao-admins', 'yiqiao-auditors'] },
};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

function configuration() {
  return {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      response_types: ['code'],
      grant_types: ['authorization_code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(16).toString('hex')] },
    claims: { openid: ['sub'], profile: ['name'], roles: ['roles'] },
    // Put the requested claims into the ID token (the gateway reads roles from it).
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    features: { devInteractions: { enabled: true } },
    async findAccount(_ctx, id) {
      const account = accounts[id];
      if (!account) return undefined;
      return {
        accountId: id,
        async claims() {
          return { sub: id, name: account.name, roles: account.roles };
        },
      };
    },
    // First-party client: consent is implied, so no consent screen.
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId
        || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) {
        const found = await ctx.oidc.provider.Grant.find(grantId);
        if (found) return found;
      }
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid profile roles');
      grant.addOIDCClaims(['name', 'roles']);
      await grant.save();
      return grant;
    },
  };
}

// Bind first (port 0) so the issuer URL carries the real port.
import { createServer } from 'node:http';
const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration());
  server.on('request', provider.callback());
  process.stdout.write(`ISSUER ${issuer}\n`);
});
// Never die of a closed stdout (the test reads only the first line).
process.stdout.on('error', () => {});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
