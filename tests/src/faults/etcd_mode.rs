//! The world's side of the etcd mode: the flags every daemon gets, the
//! addresses a primary may serve at, and the leader samples taken while
//! the driver waits (`EtcdWorld::look`).

use tandem_shared::tls::TlsFiles;

use super::etcd_world::{PRIMARY_NAME, SAMPLE_EVERY};
use super::world::World;

impl World {
    /// Every address a primary of this world may serve at.
    pub fn primary_urls(&self) -> Vec<String> {
        let mut urls = Vec::new();
        if let Some(p) = &self.primary {
            urls.push(format!("https://{}", p.addr));
        }
        if let Some(e) = &self.etcd {
            for a in &e.promote_listen {
                urls.push(format!("https://{a}"));
            }
        }
        urls
    }

    pub fn tls_files(&self) -> TlsFiles {
        let p = |f: &str| self.certs.dir.join(f);
        TlsFiles {
            cert: p("standby.pem"),
            key: p("standby-key.pem"),
            ca: p("ca.pem"),
        }
    }

    /// Samples the leaders when the etcd world runs and a sample is due;
    /// records what it finds. The leader key as last seen is returned.
    pub fn sample_leaders(&mut self, force: bool) -> Option<tandem_coord::records::LeaderRecord> {
        let due = self
            .etcd
            .as_ref()
            .is_some_and(|e| force || e.last_sample.elapsed() >= SAMPLE_EVERY);
        if !due {
            return None;
        }
        let urls = self.primary_urls();
        let tls = self.tls_files();
        let look = self.etcd.as_mut()?.look(&urls, &tls);
        self.count("leader samples (never two leaders)");
        for v in look.violations {
            self.violation(v);
        }
        look.leader
    }

    /// The extra `run` flags of the primary in the etcd world.
    pub fn primary_etcd_args(&self, on_fence: bool) -> Vec<String> {
        let Some(e) = &self.etcd else {
            return Vec::new();
        };
        let mut a = vec![
            "--etcd".to_owned(),
            e.primary_endpoints(),
            "--cluster".into(),
            e.cluster_name(),
            "--name".into(),
            PRIMARY_NAME.into(),
            "--advertise-url".into(),
            self.standbys[0].link.url(),
        ];
        if on_fence {
            a.push("--on-fence".into());
            a.push(format!(
                "echo fenced >> '{}'; kill -9 $(cat '{}' 2>/dev/null) 2>/dev/null; true",
                e.fences.display(),
                e.app_pid.display()
            ));
        }
        a.extend(e.timing_args.iter().cloned());
        a
    }

    /// The extra `run` flags of standby `i` in the etcd world.
    pub fn standby_etcd_args(&self, i: usize) -> Vec<String> {
        let Some(e) = &self.etcd else {
            return Vec::new();
        };
        let mut a = vec![
            "--etcd".to_owned(),
            e.cluster.endpoints(),
            "--cluster".into(),
            e.cluster_name(),
            "--promote-listen".into(),
            e.promote_listen[i].to_string(),
        ];
        a.extend(e.timing_args.iter().cloned());
        a
    }
}
