//! The MinIO admin API's body encryption (madmin `EncryptData` /
//! `DecryptData`, sio-go's stream format), written from its description
//! (object-storage.md §1.4):
//!
//! ```text
//! salt[32] || id[1] || nonce8[8] || fragment_1 || … || fragment_n      (n ≥ 1)
//! id 0: key = Argon2id(password, salt, t=1, m=64 MiB, p=4, 32 bytes); AES-256-GCM
//! id 1: same key; ChaCha20-Poly1305
//! id 2: key = PBKDF2-HMAC-SHA256(password, salt, 8192, 32 bytes); AES-256-GCM
//! nonce(c) = nonce8 || LE32(c); tag0 = Seal(nonce(0), "", "")
//! fragment_i = Seal(nonce(i), piece_i, (0x00 | 0x80 if final) || tag0)
//! pieces of 16384 bytes; the final one 0..=16384 bytes, always present
//! ```

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use chacha20poly1305::ChaCha20Poly1305;

/// Plaintext bytes per fragment.
pub const BUF_SIZE: usize = 1 << 14;
const TAG: usize = 16;
const HEADER: usize = 32 + 1 + 8;

/// The key-derivation and cipher of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Argon2id + AES-256-GCM (id 0; what madmin writes on AES-NI CPUs).
    Argon2idAesGcm = 0,
    /// Argon2id + ChaCha20-Poly1305 (id 1).
    Argon2idChaCha20Poly1305 = 1,
    /// PBKDF2-SHA256 + AES-256-GCM (id 2; madmin's FIPS mode).
    Pbkdf2AesGcm = 2,
}

/// Why a payload could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SioError {
    /// Too short or an unknown algorithm id.
    #[error("not an encrypted admin payload: {0}")]
    Format(String),
    /// Wrong password or altered data.
    #[error("sio: data is not authentic")]
    NotAuthentic,
}

/// Whether `data` looks like an encrypted payload (madmin `IsEncrypted`).
pub fn is_encrypted(data: &[u8]) -> bool {
    data.len() > 32 && data[32] <= 2
}

fn derive(alg: Algorithm, password: &[u8], salt: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    match alg {
        Algorithm::Argon2idAesGcm | Algorithm::Argon2idChaCha20Poly1305 => {
            let params = argon2::Params::new(64 * 1024, 1, 4, Some(32))
                .expect("madmin's Argon2id parameters are valid");
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(password, salt, &mut key)
                .expect("a 32-byte salt and key are valid for Argon2id");
        }
        Algorithm::Pbkdf2AesGcm => {
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, 8192, &mut key);
        }
    }
    key
}

enum Cipher {
    Aes(Box<Aes256Gcm>),
    ChaCha(Box<ChaCha20Poly1305>),
}

impl Cipher {
    fn new(alg: Algorithm, key: &[u8; 32]) -> Self {
        match alg {
            Algorithm::Argon2idChaCha20Poly1305 => {
                Cipher::ChaCha(Box::new(ChaCha20Poly1305::new(key.into())))
            }
            _ => Cipher::Aes(Box::new(Aes256Gcm::new(key.into()))),
        }
    }
    fn seal(&self, nonce: &[u8; 12], msg: &[u8], aad: &[u8]) -> Vec<u8> {
        let p = Payload { msg, aad };
        match self {
            Cipher::Aes(c) => c.encrypt(nonce.into(), p),
            Cipher::ChaCha(c) => c.encrypt(nonce.into(), p),
        }
        .expect("AEAD sealing of a bounded fragment cannot fail")
    }
    fn open(&self, nonce: &[u8; 12], msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, SioError> {
        let p = Payload { msg, aad };
        match self {
            Cipher::Aes(c) => c.decrypt(nonce.into(), p),
            Cipher::ChaCha(c) => c.decrypt(nonce.into(), p),
        }
        .map_err(|_| SioError::NotAuthentic)
    }
}

fn nonce(n8: &[u8], counter: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(n8);
    n[8..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Encrypts `plaintext` with `password` (the secret key of the credential
/// that signs the request), with random salt and nonce.
pub fn encrypt(password: &str, plaintext: &[u8], alg: Algorithm) -> Vec<u8> {
    let rnd = vivian_core::storage::random_bytes(40);
    encrypt_with(password, plaintext, alg, &rnd[..32], &rnd[32..40])
}

/// [`encrypt`] with a given salt (32 bytes) and nonce (8 bytes).
pub fn encrypt_with(
    password: &str,
    plaintext: &[u8],
    alg: Algorithm,
    salt: &[u8],
    nonce8: &[u8],
) -> Vec<u8> {
    let key = derive(alg, password.as_bytes(), salt);
    let c = Cipher::new(alg, &key);
    let tag0 = c.seal(&nonce(nonce8, 0), b"", b"");
    let mut out =
        Vec::with_capacity(HEADER + plaintext.len() + TAG * (plaintext.len() / BUF_SIZE + 1));
    out.extend_from_slice(salt);
    out.push(alg as u8);
    out.extend_from_slice(nonce8);
    let pieces: Vec<&[u8]> = if plaintext.is_empty() {
        vec![&[]]
    } else {
        plaintext.chunks(BUF_SIZE).collect()
    };
    let last = pieces.len() - 1;
    for (i, piece) in pieces.iter().enumerate() {
        let mut ad = Vec::with_capacity(1 + TAG);
        ad.push(if i == last { 0x80 } else { 0x00 });
        ad.extend_from_slice(&tag0);
        out.extend(c.seal(&nonce(nonce8, i as u32 + 1), piece, &ad));
    }
    out
}

/// Decrypts a payload of any of the three algorithms.
pub fn decrypt(password: &str, data: &[u8]) -> Result<Vec<u8>, SioError> {
    if data.len() < HEADER + TAG {
        return Err(SioError::Format(format!("{} bytes", data.len())));
    }
    let alg = match data[32] {
        0 => Algorithm::Argon2idAesGcm,
        1 => Algorithm::Argon2idChaCha20Poly1305,
        2 => Algorithm::Pbkdf2AesGcm,
        x => return Err(SioError::Format(format!("unknown algorithm id {x}"))),
    };
    let key = derive(alg, password.as_bytes(), &data[..32]);
    let c = Cipher::new(alg, &key);
    let n8 = &data[33..41];
    let tag0 = c.seal(&nonce(n8, 0), b"", b"");
    let body = &data[HEADER..];
    let chunks: Vec<&[u8]> = body.chunks(BUF_SIZE + TAG).collect();
    let last = chunks.len() - 1;
    let mut out = Vec::with_capacity(body.len());
    for (i, chunk) in chunks.iter().enumerate() {
        if chunk.len() < TAG {
            return Err(SioError::NotAuthentic);
        }
        let mut ad = Vec::with_capacity(1 + TAG);
        ad.push(if i == last { 0x80 } else { 0x00 });
        ad.extend_from_slice(&tag0);
        out.extend(c.open(&nonce(n8, i as u32 + 1), chunk, &ad)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers generated by Debian's madmin-go 2.0.7 `EncryptData`
    /// (object-storage.md §1.4).
    #[test]
    fn madmin_known_answers() {
        let ct = hex::decode("3a7b1c2b43b8563b9d6641d7714e4fe79827d11e0df6f3921c26794f5d29740d00ae8ce7cebe82287c1585c55301000099096b2d8a251096fb17b66e66df2f6ed328af5053116742b585ce7657340d1080a449eb87a5dcfe025a56a2be8ffe2ce61c6a32594055212dd26346f201f32f9c6754430fc46865855904e3").unwrap();
        let pt = br#"{"secretKey":"0123456789abcdef0123456789abcdef","status":"enabled"}"#;
        assert_eq!(decrypt("minio-root-password", &ct).unwrap(), pt);
        // Same salt and nonce: byte for byte what madmin wrote.
        assert_eq!(
            encrypt_with(
                "minio-root-password",
                pt,
                Algorithm::Argon2idAesGcm,
                &ct[..32],
                &ct[33..41]
            ),
            ct
        );
        let empty = hex::decode("8602e05721ab6a2d786f5e2d15576f1f56da6c087ccf26196b2e4bba32cfd11000569d46fed058325dd368728267184ddcc8d294625f98d99f").unwrap();
        assert_eq!(decrypt("minio-root-password", &empty).unwrap(), b"");
        assert_eq!(
            encrypt_with(
                "minio-root-password",
                b"",
                Algorithm::Argon2idAesGcm,
                &empty[..32],
                &empty[33..41]
            ),
            empty
        );
        assert_eq!(decrypt("wrong", &ct), Err(SioError::NotAuthentic));
    }

    #[test]
    fn round_trips_sizes_and_algorithms() {
        // Argon2id costs 64 MiB per key: one size for it, all sizes with PBKDF2.
        let cases = [0usize, 1, 16383, 16384, 16385, 40000]
            .into_iter()
            .map(|n| (Algorithm::Pbkdf2AesGcm, n))
            .chain([(Algorithm::Argon2idChaCha20Poly1305, 16385)]);
        for (alg, n) in cases {
            {
                let pt: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                let ct = encrypt("pw", &pt, alg);
                assert_eq!(
                    ct.len(),
                    41 + n + 16 * std::cmp::max(1, n.div_ceil(BUF_SIZE)),
                    "{n}"
                );
                assert!(is_encrypted(&ct));
                assert_eq!(decrypt("pw", &ct).unwrap(), pt);
                // Truncated or altered: refused.
                assert!(decrypt("pw", &ct[..ct.len() - 1]).is_err());
                let mut bad = ct.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(decrypt("pw", &bad).is_err());
            }
        }
        // No fragment at all (what minio-py writes for an empty payload).
        let ct = encrypt("pw", b"", Algorithm::Pbkdf2AesGcm);
        assert!(decrypt("pw", &ct[..41]).is_err());
    }
}
