//! Measures the two candidate RSA backends for keyvault's private-key work
//! on this machine: RSA-2048 PKCS#1 v1.5 decryption and the raw type-1
//! signature over a 20-byte HMAC, single-threaded, ops/s.
//!
//! cargo run --release -p trellis-keyvault --example rsa_backends [-- seconds]
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_keyvault::backend::{
    OpensslBackend, PrivateOps, RustCryptoBackend, generate_pkcs8_der,
};

fn measure(for_at_least: Duration, mut op: impl FnMut()) -> f64 {
    // Warm up, then count whole operations until the time is up.
    for _ in 0..10 {
        op();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_at_least {
        op();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let window = Duration::from_secs_f64(secs);
    let der = generate_pkcs8_der(2048)?;
    let public = {
        use rsa::pkcs8::DecodePrivateKey;
        rsa::PrivateKey::from_pkcs8_der(&der)?.to_public_key()
    };
    let mut rng = rand::rand_core::UnwrapErr(rand::rngs::SysRng);
    let plaintext = [0x5au8; 214]; // nonce || id || RSA-1024 DER: the handshake's size
    let ciphertext = public.encrypt(&mut rng, rsa::Pkcs1v15Encrypt, &plaintext)?;
    let hmac = [0xa5u8; 20];

    let backends: Vec<Box<dyn PrivateOps>> = vec![
        Box::new(RustCryptoBackend::from_pkcs8_der(&der)?),
        Box::new(OpensslBackend::from_pkcs8_der(&der)?),
    ];
    println!(
        "RSA-2048 private operations, one thread, {secs} s each ({}; {} cores)",
        openssl::version::version(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<10} {:>14} {:>14} {:>18}",
        "backend", "decrypt/s", "sign/s", "handshakes/s/core"
    );
    for b in &backends {
        assert_eq!(
            &**b.decrypt(&ciphertext)?,
            &plaintext[..],
            "{} decrypt",
            b.name()
        );
        let decrypt = measure(window, || {
            std::hint::black_box(b.decrypt(&ciphertext).ok());
        });
        let sign = measure(window, || {
            std::hint::black_box(b.sign_raw(&hmac).ok());
        });
        // One decryption and one signature per handshake.
        let handshakes = 1.0 / (1.0 / decrypt + 1.0 / sign);
        println!(
            "{:<10} {:>14.0} {:>14.0} {:>18.0}",
            b.name(),
            decrypt,
            sign,
            handshakes
        );
    }

    // The whole machine: keyvault's pool (one worker per core) doing the
    // handshake's decrypt + sign pairs as fast as it can.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let runtime = tokio::runtime::Runtime::new()?;
    for b in [
        Arc::new(RustCryptoBackend::from_pkcs8_der(&der)?) as Arc<dyn PrivateOps>,
        Arc::new(OpensslBackend::from_pkcs8_der(&der)?),
    ] {
        let name = b.name();
        let pool = trellis_keyvault::Pool::new(b, cores, 4 * cores)?;
        let rate = runtime.block_on(async {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..2 * cores {
                let pool = pool.clone();
                let ct = ciphertext.clone();
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while start.elapsed() < window {
                        if pool.decrypt(ct.clone()).await.is_ok()
                            && pool.sign_raw(hmac.to_vec()).await.is_ok()
                        {
                            n += 1;
                        }
                    }
                    n
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap_or(0);
            }
            total as f64 / start.elapsed().as_secs_f64()
        });
        println!("{name:<10} handshakes/s through the pool ({cores} workers): {rate:.0}");
    }
    Ok(())
}
