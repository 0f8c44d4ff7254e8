//! `jwt`: bearer tokens signed by keys of a JWKS file, verified with the
//! `jsonwebtoken` crate (ring underneath, as our TLS): RS256/384/512,
//! PS256/384/512, ES256/384 and EdDSA. Symmetric (`oct`) keys are refused
//! when the file is read, so that a public key can never be used as an
//! HMAC secret, and `alg: none` is no algorithm at all to the crate.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::path::{Path, PathBuf};

/// Largest JWKS file read.
const MAX_FILE: u64 = 1 << 20;
/// Clock difference tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// A rule's `jwt` settings with the JWKS's keys, ready to verify.
#[derive(Clone)]
pub struct JwtPolicy {
    pub jwks: PathBuf,
    /// The file as read: two policies are the same when their texts are.
    text: String,
    /// Names the keys and checks (not the claims copied): tokens verified
    /// under one fingerprint are valid under any policy of the same one.
    fingerprint: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Verified claims copied to the upstream request: (claim, header).
    pub claims_to_headers: Vec<(String, http::HeaderName)>,
    keys: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The algorithms the key can verify (its `alg` alone, when it names one).
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl PartialEq for JwtPolicy {
    fn eq(&self, other: &Self) -> bool {
        (&self.jwks, &self.text, &self.issuer, &self.audience, &self.claims_to_headers)
            == (&other.jwks, &other.text, &other.issuer, &other.audience, &other.claims_to_headers)
    }
}

impl Eq for JwtPolicy {}

impl std::fmt::Debug for JwtPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtPolicy")
            .field("jwks", &self.jwks)
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("claims_to_headers", &self.claims_to_headers)
            .finish()
    }
}

/// Verified claims.
pub type Claims = serde_json::Map<String, serde_json::Value>;

impl JwtPolicy {
    /// Reads the JWKS at `jwks` and keeps its keys; the error says what is wrong.
    pub fn load(
        jwks: &Path,
        issuer: Option<String>,
        audience: Option<String>,
        claims_to_headers: Vec<(String, http::HeaderName)>,
    ) -> Result<Self, String> {
        let bytes =
            crate::units::read_bounded(jwks, MAX_FILE).map_err(|e| format!("cannot read {}: {e}", jwks.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", jwks.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a JWKS ({{\"keys\": [...]}}): {e}", jwks.display()))?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = jwk.common.key_id.clone().unwrap_or_else(|| format!("keys[{i}]"));
            let family: &[Algorithm] = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => &[Algorithm::ES256],
                    EllipticCurve::P384 => &[Algorithm::ES384],
                    _ => return Err(format!("{}: key {name}: unsupported curve", jwks.display())),
                },
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
                AlgorithmParameters::OctetKeyPair(_) => {
                    return Err(format!("{}: key {name}: unsupported curve", jwks.display()))
                }
                AlgorithmParameters::OctetKey(_) => {
                    return Err(format!(
                        "{}: key {name}: symmetric (oct) keys are refused; publish public keys only",
                        jwks.display()
                    ))
                }
            };
            let algorithms = match jwk.common.key_algorithm.map(|a| a.to_string().parse::<Algorithm>()) {
                None => family.to_vec(),
                Some(Ok(a)) if family.contains(&a) => vec![a],
                Some(_) => return Err(format!("{}: key {name}: its alg does not fit its key type", jwks.display())),
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{}: key {name}: {e}", jwks.display()))?;
            keys.push(Key { kid: jwk.common.key_id.clone(), algorithms, key });
        }
        if keys.is_empty() {
            return Err(format!("{}: no keys", jwks.display()));
        }
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (jwks, &text, &issuer, &audience).hash(&mut h);
            h.finish()
        };
        Ok(JwtPolicy { jwks: jwks.to_path_buf(), text, fingerprint, issuer, audience, claims_to_headers, keys })
    }

    /// What a verified token is remembered under, with the token: the
    /// keys, issuer and audience it was checked against.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The same keys and checks, copying `claims` to the upstream.
    pub fn with_claims(&self, claims: Vec<(String, http::HeaderName)>) -> Self {
        JwtPolicy { claims_to_headers: claims, ..self.clone() }
    }

    /// The token's claims if a key of the set signed it and its `exp`,
    /// `nbf`, issuer and audience hold; else why not, in a few words.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let mut candidates = self.keys.iter().filter(|k| k.algorithms.contains(&header.alg));
        let mut last = String::from("no key of the set fits the token's algorithm");
        let mut tried = 0;
        for key in candidates.by_ref() {
            if header.kid.is_some() && key.kid.is_some() && header.kid != key.kid {
                continue;
            }
            tried += 1;
            let mut v = Validation::new(header.alg);
            v.leeway = LEEWAY_SECS;
            v.validate_nbf = true;
            // `exp` is required, and `iss` and `aud` when configured: the
            // crate checks them only when a token carries them.
            let mut required = vec!["exp"];
            required.extend(self.issuer.as_ref().map(|_| "iss"));
            required.extend(self.audience.as_ref().map(|_| "aud"));
            v.set_required_spec_claims(&required);
            match &self.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &self.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => "bad signature".into(),
                        ErrorKind::ExpiredSignature => "token expired".into(),
                        ErrorKind::ImmatureSignature => "token not yet valid (nbf)".into(),
                        ErrorKind::InvalidIssuer => "wrong issuer".into(),
                        ErrorKind::InvalidAudience => "wrong audience".into(),
                        ErrorKind::MissingRequiredClaim(c) => format!("no {c} claim"),
                        _ => format!("invalid token: {e}"),
                    };
                    // Only a bad signature is worth trying the next key for.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        return Err(last);
                    }
                }
            }
        }
        if tried == 0 && header.kid.is_some() {
            return Err("no key of the set has the token's kid".into());
        }
        Err(last)
    }
}

/// A claim's value as a header carries it: strings as they are, other
/// values as JSON.
pub fn claim_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
