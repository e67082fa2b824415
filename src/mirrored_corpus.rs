//! The engine's working corpus: held in memory, mirrored to a directory (one raw input per
//! file, named by its content's hash, as LibAFL's on-disk corpora name them) by a writer
//! thread. A young campaign adds a hundred entries a second, and creating a file costs the
//! kernel far more than a run of the model (ext4 hunts for a free inode for each); on the
//! fuzzing thread that was a tenth of the campaign's time. The writer is outside every model
//! run, so runs stay deterministic; `flush` waits for it, and a campaign flushes before it
//! reports, so the directory is complete when the command returns.

use std::cell::{Ref, RefCell, RefMut};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use libafl::corpus::{
    Corpus, CorpusId, EnableDisableCorpus, HasTestcase, InMemoryCorpus, Testcase,
};
use libafl::inputs::{BytesInput, Input};
use libafl::Error;
use serde::{Deserialize, Serialize};

/// What the writer does.
enum Job {
    /// Writes the file `name` with these bytes (through a temporary file and a rename, so a
    /// reader never sees half an input), unless it exists: equal names are equal contents.
    Write(String, Vec<u8>),
    /// Removes the file `name`.
    Remove(String),
}

/// The writer thread and its queue.
struct Writer {
    jobs: Sender<Job>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl Writer {
    fn start(dir: PathBuf) -> Self {
        let (jobs, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("corpus-writer".into())
            .spawn(move || {
                // The first error is the one reported; the rest of the queue is still tried.
                let mut first: std::io::Result<()> = Ok(());
                for job in rx {
                    let r = match job {
                        Job::Write(name, bytes) => write(&dir, &name, &bytes),
                        Job::Remove(name) => match std::fs::remove_file(dir.join(name)) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                            _ => Ok(()),
                        },
                    };
                    if first.is_ok() {
                        first = r;
                    }
                }
                first
            })
            .expect("spawning the corpus writer");
        Writer { jobs, thread }
    }

    /// Ends the queue and waits for every job.
    fn finish(self) -> std::io::Result<()> {
        drop(self.jobs);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the corpus writer panicked")))
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let path = dir.join(name);
    if path.exists() {
        return Ok(());
    }
    // A per-process temporary name: clients of --jobs share the directory.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)
}

/// An in-memory corpus mirrored to `dir` (see the module doc).
#[derive(Serialize, Deserialize)]
pub struct MirroredCorpus {
    inner: InMemoryCorpus<BytesInput>,
    dir: PathBuf,
    /// Started on the first write (a corpus brought back by a restarted client starts its
    /// own).
    #[serde(skip)]
    writer: Option<Writer>,
}

impl MirroredCorpus {
    /// An empty corpus mirrored to `dir`, which is created if missing.
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            inner: InMemoryCorpus::new(),
            dir,
            writer: None,
        })
    }

    /// Waits until every entry added so far is on disk.
    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.writer.take() {
            Some(w) => w.finish(),
            None => Ok(()),
        }
    }

    fn send(&mut self, job: Job) {
        let dir = &self.dir;
        let w = self
            .writer
            .get_or_insert_with(|| Writer::start(dir.clone()));
        // The writer only ends when `flush` takes it, so the queue is open.
        let _ = w.jobs.send(job);
    }

    fn save(&mut self, id: CorpusId) -> Result<(), Error> {
        let job = {
            let tc = self.inner.get_from_all(id)?.borrow();
            let input = tc
                .input()
                .as_ref()
                .ok_or_else(|| Error::empty("a corpus entry without its input"))?;
            Job::Write(input.generate_name(None), input.as_ref().to_vec())
        };
        self.send(job);
        Ok(())
    }

    fn forget(&mut self, tc: &Testcase<BytesInput>) {
        if let Some(input) = tc.input() {
            self.send(Job::Remove(input.generate_name(None)));
        }
    }
}

impl Drop for MirroredCorpus {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("writing the corpus to {}: {e}", self.dir.display());
        }
    }
}

impl Corpus<BytesInput> for MirroredCorpus {
    fn count(&self) -> usize {
        self.inner.count()
    }

    fn count_disabled(&self) -> usize {
        self.inner.count_disabled()
    }

    fn count_all(&self) -> usize {
        self.inner.count_all()
    }

    fn add(&mut self, testcase: Testcase<BytesInput>) -> Result<CorpusId, Error> {
        let id = self.inner.add(testcase)?;
        self.save(id)?;
        Ok(id)
    }

    fn add_disabled(&mut self, testcase: Testcase<BytesInput>) -> Result<CorpusId, Error> {
        let id = self.inner.add_disabled(testcase)?;
        self.save(id)?;
        Ok(id)
    }

    fn replace(
        &mut self,
        id: CorpusId,
        testcase: Testcase<BytesInput>,
    ) -> Result<Testcase<BytesInput>, Error> {
        let old = self.inner.replace(id, testcase)?;
        self.forget(&old);
        self.save(id)?;
        Ok(old)
    }

    fn remove(&mut self, id: CorpusId) -> Result<Testcase<BytesInput>, Error> {
        let old = self.inner.remove(id)?;
        self.forget(&old);
        Ok(old)
    }

    fn get(&self, id: CorpusId) -> Result<&RefCell<Testcase<BytesInput>>, Error> {
        self.inner.get(id)
    }

    fn get_from_all(&self, id: CorpusId) -> Result<&RefCell<Testcase<BytesInput>>, Error> {
        self.inner.get_from_all(id)
    }

    fn current(&self) -> &Option<CorpusId> {
        self.inner.current()
    }

    fn current_mut(&mut self) -> &mut Option<CorpusId> {
        self.inner.current_mut()
    }

    fn next(&self, id: CorpusId) -> Option<CorpusId> {
        self.inner.next(id)
    }

    fn peek_free_id(&self) -> CorpusId {
        self.inner.peek_free_id()
    }

    fn prev(&self, id: CorpusId) -> Option<CorpusId> {
        self.inner.prev(id)
    }

    fn first(&self) -> Option<CorpusId> {
        self.inner.first()
    }

    fn last(&self) -> Option<CorpusId> {
        self.inner.last()
    }

    fn nth(&self, nth: usize) -> CorpusId {
        self.inner.nth(nth)
    }

    fn nth_from_all(&self, nth: usize) -> CorpusId {
        self.inner.nth_from_all(nth)
    }

    fn load_input_into(&self, testcase: &mut Testcase<BytesInput>) -> Result<(), Error> {
        self.inner.load_input_into(testcase)
    }

    fn store_input_from(&self, testcase: &Testcase<BytesInput>) -> Result<(), Error> {
        self.inner.store_input_from(testcase)
    }
}

impl EnableDisableCorpus for MirroredCorpus {
    fn disable(&mut self, id: CorpusId) -> Result<(), Error> {
        self.inner.disable(id)
    }

    fn enable(&mut self, id: CorpusId) -> Result<(), Error> {
        self.inner.enable(id)
    }
}

impl HasTestcase<BytesInput> for MirroredCorpus {
    fn testcase(&self, id: CorpusId) -> Result<Ref<'_, Testcase<BytesInput>>, Error> {
        self.inner.testcase(id)
    }

    fn testcase_mut(&self, id: CorpusId) -> Result<RefMut<'_, Testcase<BytesInput>>, Error> {
        self.inner.testcase_mut(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn entries_reach_the_directory_by_flush_and_leave_it_when_removed() {
        let dir = std::env::temp_dir().join(format!("tdxfuzz-mirrored-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = MirroredCorpus::new(dir.clone()).unwrap();
        let inputs: Vec<BytesInput> = (0u8..20).map(|i| BytesInput::new(vec![i; 3])).collect();
        let ids: Vec<CorpusId> = inputs
            .iter()
            .map(|i| c.add(Testcase::new(i.clone())).unwrap())
            .collect();
        // The same input twice is one file.
        c.add(Testcase::new(inputs[0].clone())).unwrap();
        c.flush().unwrap();
        let mut want: Vec<_> = inputs
            .iter()
            .map(|i| (i.generate_name(None), i.as_ref().to_vec()))
            .collect();
        want.sort();
        assert_eq!(files(&dir), want, "every input, raw, named by its hash");
        // After a flush the corpus goes on with a new writer.
        c.remove(ids[3]).unwrap();
        c.replace(ids[4], Testcase::new(BytesInput::new(b"new".to_vec())))
            .unwrap();
        drop(c);
        let names: Vec<String> = files(&dir).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.len(),
            19,
            "20, less one removed, one replaced by a new one"
        );
        assert!(!names.contains(&inputs[3].generate_name(None)));
        assert!(!names.contains(&inputs[4].generate_name(None)));
        assert!(names.contains(&BytesInput::new(b"new".to_vec()).generate_name(None)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
