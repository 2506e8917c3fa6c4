//! Throw-away TLS material for the server backends' TLS tests, made once
//! here for every backend: a test CA, a server certificate it signed for
//! `localhost` and 127.0.0.1, a client certificate it signed, and a second
//! CA that signed nothing (to check that a wrong CA is refused).
//!
//! Made with the `openssl` command-line tool (`scripts/setup` installs
//! it), with P-256 keys, valid for two days, in a temporary directory that
//! is removed when the [`TestCerts`] is dropped. Test code only: the keys
//! are not protected.

use std::path::{Path, PathBuf};
use std::process::Command;

/// PEM files for one TLS test (see the module docs).
#[derive(Debug)]
pub struct TestCerts {
    /// The directory holding every file (removed on drop).
    pub dir: PathBuf,
    /// The test CA's certificate: what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate, signed by [`TestCerts::ca`], for
    /// `localhost` and 127.0.0.1, usable as a server and as a client
    /// certificate (a Redis Cluster's nodes present it to each other).
    pub server_cert: PathBuf,
    /// The server certificate's key.
    pub server_key: PathBuf,
    /// A client certificate signed by [`TestCerts::ca`], whose common name
    /// is the `client_name` given to [`TestCerts::generate`] (PostgreSQL's
    /// `cert` authentication maps it to a role).
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
    /// Another CA's certificate, which signed nothing here: trusting it
    /// instead of [`TestCerts::ca`] must fail verification.
    pub other_ca: PathBuf,
}

impl TestCerts {
    /// Make a new set, the client certificate for `client_name`.
    ///
    /// # Panics
    /// When `openssl` is missing or fails (the message says how to get it).
    pub fn generate(client_name: &str) -> TestCerts {
        let dir = tempfile::tempdir()
            .expect("a temporary directory for certificates")
            .keep();
        let openssl = |args: &[&str]| run_openssl(&dir, args);
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for (key, pem, cn) in [
            ("ca.key", "ca.pem", "/CN=Conveyor test CA"),
            ("other.key", "other.pem", "/CN=Another test CA"),
        ] {
            let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
            args.extend(ec);
            args.extend(["-keyout", key, "-out", pem, "-subj", cn]);
            openssl(&args);
        }
        let client_subject = format!("/CN={client_name}");
        for (name, subject, ext) in [
            (
                "server",
                "/CN=localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            (
                "client",
                client_subject.as_str(),
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=clientAuth\n",
            ),
        ] {
            let (key, csr, pem, cnf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.cnf"),
            );
            let mut args = vec!["req", "-nodes"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
            openssl(&args);
            std::fs::write(dir.join(&cnf), ext).expect("write an openssl extension file");
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &cnf,
            ]);
        }
        TestCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other.pem"),
            dir,
        }
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect(
            "the TLS tests need the `openssl` command (scripts/setup, or apt-get install openssl)",
        );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
